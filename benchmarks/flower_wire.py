"""Bytes on the wire in real Flower simulation runs, against the closed form ``round_bytes``.

    python benchmarks/flower_wire.py                                   # prints the table (minutes)
    python benchmarks/flower_wire.py --out docs/flower-wire-bytes.md   # and writes it
    python benchmarks/flower_wire.py --work /tmp/fw --methods fedit flora

Starts one simulation-mode SuperLink on a free loopback port (``fedlora.engines.flower.local``), then, per
method, runs a tiny real federation with ``flwr run <repo> sim`` (RTE, 2 SuperNodes, 2 rounds,
1 local step, batch 4, max length 32, seed 0). From each run's ``metrics.jsonl`` it compares the
LoRA bytes the messages carried (``wire_lora_bytes_up/down``) with ``round_bytes`` at the shapes of
the run's checkpoint and the round's clients, and explains every difference with the reasons in
docs/flower.md ("Bytes on the wire"). A difference it cannot explain is printed as UNEXPLAINED and
the script exits with status 1. The SuperLink is stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlora.aggregation import get_method
from fedlora.aggregation.communication import FLOAT32_BYTES, round_bytes
from fedlora.bench.comm import checkpoint_modules, shape_adapter
from fedlora.config.run import RunConfig
from fedlora.engines.flower.config import run_config_overrides
from fedlora.engines.flower.local import simulation_superlink

REPO = Path(__file__).resolve().parents[1]
METHODS = ["fedit", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "svd", "flora-na"]
RUN: dict[str, Any] = {"task": "rte", "rounds": 2, "clients": 2, "alpha": 0.5, "local_steps": 1, "batch_size": 4,
                       "max_length": 32, "seed": 0, "eval_local_every": 1, "max_eval_examples": 16,
                       "max_local_eval_examples": 8}
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2"


def run_config(method: str, data_dir: Path, out: Path) -> str:
    """``flwr run --run-config`` overrides, spelled from RunConfig's own declarations."""
    return run_config_overrides(RunConfig(**RUN, method=method, data_dir=str(data_dir), out=str(out)))


def flower_run(method: str, data_dir: Path, out: Path, env: dict[str, str], timeout: float) -> None:
    """One real Flower simulation run; raises with the output tail if it wrote no metrics."""
    cmd = ["flwr", "run", str(REPO), "sim", "--stream", "--run-config", run_config(method, data_dir, out),
           "--federation-config", FEDERATION]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    metrics = out / "metrics.jsonl"
    if proc.returncode != 0 or not (out / "adapter").is_dir() or not metrics.read_text().strip():
        raise RuntimeError(f"{method}: flwr run failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def explain(method: str, record: dict[str, Any], modules: list[tuple[str, int, int, int]], up: int, down: int) -> str:
    """'yes', a documented reason for the difference, or one starting with UNEXPLAINED (``up``/``down``: round_bytes)."""
    U, rnd = len(record["clients"]), record["round"]
    wire_up, wire_down = record["wire_lora_bytes_up"], record["wire_lora_bytes_down"]
    B_bytes = FLOAT32_BYTES * sum(d * r for _, r, d, _ in modules)  # one client's B, all modules
    dense = FLOAT32_BYTES * sum(d * k for _, _, d, k in modules)  # one client's dense (d, k) delta
    problems = []
    if (record["lora_bytes_up"], record["lora_bytes_down"]) != (up, down):
        problems.append(f"recorded lora_bytes {record['lora_bytes_up']}/{record['lora_bytes_down']} != round_bytes {up}/{down}")
    if (record["wire_head_bytes_up"], record["wire_head_bytes_down"]) != (
            record["bytes_up"] - record["lora_bytes_up"], record["bytes_down"] - record["lora_bytes_down"]):
        problems.append("head bytes != bytes_* - lora_bytes_*")
    if (record["wire_eval_bytes_up"], record["wire_eval_bytes_down"]) != ((U * B_bytes if method == "fedsa-lora" else 0), 0):
        problems.append(f"eval-only bytes {record['wire_eval_bytes_up']}/{record['wire_eval_bytes_down']}")
    if wire_up != up:
        problems.append(f"up {wire_up} != {up}")
    note = "yes"
    if method == "fedex-lora" and rnd == 1 and wire_down == down - U * dense == up:
        note = "round 1: no residual yet, a round's (d,k) residual travels in the next round's messages (fedex-lora)"
    elif method == "flora" and rnd == 1 and wire_down == 0:
        note = ("round 1: no stacked factors yet, a round's stacked factors travel in the next round's messages; "
                "the re-initialised A, B are drawn by each client from the seed the server names (flora)")
    elif wire_down != down:
        problems.append(f"down {wire_down} != {down}")
    if method == "fedsa-lora" and note == "yes" and not problems:
        note = "yes (+ each client's B up as eval-B, outside the protocol)"
    return f"UNEXPLAINED: {'; '.join(problems)}" if problems else note


def rows_for(method: str, out: Path) -> list[dict[str, Any]]:
    modules = checkpoint_modules(out)
    shapes = sorted({(r, d, k) for _, r, d, k in modules})
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        up, down = round_bytes(get_method(method).policy, shape_adapter(modules), len(r["clients"]))
        rows.append({"method": method, "round": r["round"], "clients": len(r["clients"]),
                     "wire_up": r["wire_lora_bytes_up"], "up": up, "wire_down": r["wire_lora_bytes_down"], "down": down,
                     "head": f"{r['wire_head_bytes_up']} / {r['wire_head_bytes_down']}",
                     "eval_up": r["wire_eval_bytes_up"], "agree": explain(method, r, modules, up, down),
                     "adapter": f"{len(modules)} modules, (r, d, k) in {shapes}"})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| method | round | clients | measured LoRA up (B) | formula up (B) | measured LoRA down (B) "
              "| formula down (B) | head up/down (B) | eval-only up (B) | agree? |"), "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['round']} | {r['clients']} | {r['wire_up']} | {r['up']} | {r['wire_down']} | {r['down']} "
              f"| {r['head']} | {r['eval_up']} | {r['agree']} |" for r in rows]
    return "\n".join(lines)


def measure(methods: list[str], data_dir: Path, work: Path, timeout: float) -> list[dict[str, Any]]:
    """Start a simulation SuperLink, run every method on it, stop it (always); the table rows."""
    rows: list[dict[str, Any]] = []
    with simulation_superlink(work) as (_, env):
        for method in methods:
            start = time.monotonic()
            flower_run(method, data_dir, work / "runs" / method, env, timeout)
            print(f"[{method}: {time.monotonic() - start:.0f} s]", file=sys.stderr, flush=True)
            rows += rows_for(method, work / "runs" / method)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue")
    parser.add_argument("--work", type=Path, help="runs, logs and Flower home here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per flwr run")
    args = parser.parse_args(argv)
    describe = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    header = f"`{shlex.join(['python', *sys.argv])}` at `{describe}`\n"
    setup = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in RUN.items()) + f", {FEDERATION.split()[0]}"
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="flower-wire-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        rows = measure(args.methods, args.data_dir.resolve(), work, args.timeout)
    adapters = sorted({r["adapter"] for r in rows})
    body = (f"Setup: {setup}; adapter: {'; '.join(adapters)}. Measured = `wire_lora_bytes_*` (tensor data of the "
            f"messages' Arrays), formula = `round_bytes`; see docs/flower.md, 'Bytes on the wire'.\n\n{table(rows)}\n")
    print(body)
    if args.out:
        args.out.write_text(f"# Flower: bytes on the wire vs. round_bytes\n\n{header}\n{body}")
    return 1 if any(r["agree"].startswith("UNEXPLAINED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
