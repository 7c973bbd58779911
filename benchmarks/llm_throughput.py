"""LLM throughput and memory: SmolLM2-135M training and generation tokens/s, and the peak memory of a
10-client simulation against a 1-client one.

    python benchmarks/llm_throughput.py --threads 1                       # CPU: fp32, ~8 min on a shared 2-core CPU
    python benchmarks/llm_throughput.py --precision fp32 bf16 --grad-accum --out docs/llm-table.md
    python benchmarks/llm_throughput.py --device cuda                     # GPU: fp32 + bf16, CUDA memory stats
    python benchmarks/llm_throughput.py --skip-train --skip-generation    # only the memory comparison

Sections (each table gives ratios against a baseline measured in the same run):

  training     ``fedlora.models.training.train_local`` (the engine's step: AdamW on the LoRA factors, task loss
               weights) on real GSM8K train rows encoded by the gsm8k task (``--max-length`` 256), batches of
               ``--batch-sizes``, one untimed warm-up step, then ``--steps`` timed steps; per precision.
               supervised tok/s counts the response tokens the loss averages over (``task.loss_weight``),
               all tok/s the non-padding tokens, padded tok/s every position computed. Baseline: batch 1, fp32.
  grad-accum   (``--grad-accum``) batch 4 (the largest of ``--batch-sizes``) as 1, 2 and 4 micro-batches:
               time and peak memory. Baseline: 1 micro-batch.
  generation   ``fedlora.tasks.causal_lm.generate`` (greedy, left-padded, batched as the engine does) on
               the same ``--gen-prompts`` real GSM8K test prompts for each of ``--gen-batch-sizes``,
               ``--max-new-tokens`` each. "generated" counts the tokens up to and including each row's first
               stop token (eos / end-of-turn), "padded" is rows x decode steps (what the batch computed).
               Baseline: batch 1.
  memory       the real engine (``fedlora.engines.local.run``: gsm8k, 1 round, 1 local step, batch 1,
               max_length 128, 2 test examples, 4 new tokens, no local evaluation) with 1 and with
               ``--sim-clients`` clients, each in a fresh subprocess so peaks don't mix; the child's peak RSS
               (``VmHWM``, and ``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``. A third child
               only imports and loads the model: the floor any run pays. Goal: 10-client peak <= 1.2x 1-client.

Peak memory per training row: on the CPU the process's peak RSS after resetting it (``/proc/self/clear_refs``
``5``), i.e. model + data + activations. The reset sets the peak to the *current* RSS, and the allocator keeps
some freed memory, so a CPU row is an upper bound that can carry memory from earlier rows (the generation
rows show this: flat at the level training left); on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. CUDA timings synchronize before every clock read. The CUDA path is
UNTESTED where this was written (no GPU): treat its first run as a check of the script.

Inputs are deterministic: rows are a seeded permutation (``--seed``), LoRA init is seeded, the LoRA factors are
restored after every configuration, and generation is greedy. The machine's load average is printed before and
after every section: other processes on a shared machine slow torch down a lot (with every core busy, 2 torch
threads ran a forward pass 16x slower than 1 thread on the 2-core machine this was written on: use ``--threads``).
Also importable: ``main(argv)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RANK, LORA_ALPHA, LR = 8, 16.0, 5e-4
SIM_GOAL = 1.2
CHILD_TAG = "LLM_THROUGHPUT_CHILD "


# ----------------------------------------------------------------------------- machine and helpers


def _quiet() -> None:
    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (VmHWM: peak RSS, VmRSS: current), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mib(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:,.0f}"


class Meter:
    """Synchronized clock and peak memory for one device: CUDA allocator stats on a GPU, peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def peak_bytes(self) -> float | None:
        self.sync()
        if self.cuda:
            return float(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_kb("VmHWM")
        return None if hwm is None else hwm * 1024.0

    @property
    def peak_label(self) -> str:
        return "peak CUDA alloc MiB" if self.cuda else "peak RSS MiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "n/a"


# ----------------------------------------------------------------------------- model and data


def _model(seed: int, runtime: Any) -> tuple[Any, Any]:
    from fedlora.models.decoder import default_causal_lm_path, load_causal_lm
    from fedlora.models.runtime import attach_runtime

    model, tokenizer = load_causal_lm(default_causal_lm_path(), RANK, LORA_ALPHA, None, seed)
    attach_runtime(model, runtime)
    return model, tokenizer


def _param_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all parameter + buffer bytes, parameter count, trainable parameter count)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    return size, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def _rows(task: Any, split: Any, tokenizer: Any, n: int, max_length: int, seed: int) -> Any:
    """The first ``n`` rows of a seeded permutation of ``split``, encoded by the task."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(split))[:n]
    return task.encode(split.select(order.tolist()), tokenizer, max_length)


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# ----------------------------------------------------------------------------- training


def _train_config(model: Any, task: Any, collate: Callable[..., Any], encoded: Any, batch: int, micro: int,
                  warmup: int, steps: int, runtime: Any, meter: Meter, seed: int) -> dict[str, Any]:
    """``warmup`` untimed then ``steps`` timed ``train_local`` steps of ``batch`` rows in ``micro`` micro-batches."""
    from fedlora.aggregation import get_method
    from fedlora.models.training import train_local

    policy = get_method("fedit").policy
    rows = encoded.select_columns(["input_ids", "labels"]).to_list()
    need = batch * (warmup + steps)
    if len(rows) < need:
        raise ValueError(f"need {need} encoded rows, have {len(rows)}")
    batches = [collate(rows[i:i + batch]) for i in range(0, need, batch)]
    warm, timed = batches[:warmup], batches[warmup:]
    state = _lora_state(model)
    if warm:
        train_local(model, iter(warm), len(warm), LR, policy, seed, runtime=runtime, micro_batches=micro,
                    loss_weight=task.loss_weight)
    stamps: list[float] = []

    def clocked() -> Iterator[dict[str, Any]]:
        for b in timed:
            stamps.append(meter.now())  # the previous step has finished (train_local reads its loss)
            yield b

    meter.reset_peak()
    start = meter.now()
    out = train_local(model, clocked(), len(timed), LR, policy, seed, runtime=runtime, micro_batches=micro,
                      loss_weight=task.loss_weight)
    end = meter.now()
    peak = meter.peak_bytes()
    _restore(model, state)
    per_step = [b - a for a, b in zip(stamps, stamps[1:] + [end])]
    supervised = sum(task.loss_weight(b) for b in timed)
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(int(b["input_ids"].numel()) for b in timed)
    total = end - start
    return {"batch": batch, "micro": micro, "steps": len(timed), "seconds": total,
            "s_per_step": statistics.median(per_step), "supervised": supervised, "real": real, "padded": padded,
            "supervised_tps": supervised / total, "real_tps": real / total, "padded_tps": padded / total,
            "peak": peak, "loss": out["loss"]}


def bench_training(args: argparse.Namespace, model: Any, tokenizer: Any, task: Any, raw: Any,
                   meter: Meter, precisions: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    from fedlora.models.runtime import resolve_runtime

    need = max(args.batch_sizes) * (args.warmup + args.steps)
    encoded = _rows(task, raw["train"], tokenizer, need, args.max_length, args.seed)
    collate = task.collate(tokenizer)
    results: list[dict[str, Any]] = []
    for precision in precisions:
        runtime = resolve_runtime(str(meter.device), precision)
        for batch in args.batch_sizes:
            r = _train_config(model, task, collate, encoded, batch, 1, args.warmup, args.steps, runtime, meter, args.seed)
            r["precision"] = precision
            results.append(r)
            print(f"  train {precision} batch {batch}: {r['s_per_step']:.2f} s/step, "
                  f"{r['real_tps']:.0f} tok/s (load {_load()})", file=sys.stderr)
    base = next((r for r in results if r["batch"] == min(args.batch_sizes) and r["precision"] == "fp32"), results[0])
    header = ["precision", "batch", "timed steps", "s/step (median)", "supervised tok/s", "all tok/s",
              "padded tok/s", "all tok/s vs base", meter.peak_label]
    rows = [[r["precision"], r["batch"], r["steps"], f"{r['s_per_step']:.3f}", f"{r['supervised_tps']:.0f}",
             f"{r['real_tps']:.0f}", f"{r['padded_tps']:.0f}", _ratio(r["real_tps"], base["real_tps"]),
             _mib(r["peak"])] for r in results]
    lines = [f"Baseline: batch {base['batch']}, {base['precision']}. Tokens per timed step (batch {args.batch_sizes[-1]}): "
             f"{results[-1]['supervised'] / results[-1]['steps']:.0f} supervised, "
             f"{results[-1]['real'] / results[-1]['steps']:.0f} non-padding, "
             f"{results[-1]['padded'] / results[-1]['steps']:.0f} padded.", "", _table(header, rows)]
    if args.grad_accum:
        batch = max(args.batch_sizes)
        runtime = resolve_runtime(str(meter.device), precisions[0])
        accum = []
        for micro in (m for m in (1, 2, 4) if m <= batch):
            r = _train_config(model, task, collate, encoded, batch, micro, args.warmup, args.steps, runtime, meter,
                              args.seed)
            accum.append(r)
            print(f"  grad-accum batch {batch} x{micro}: {r['s_per_step']:.2f} s/step (load {_load()})", file=sys.stderr)
        b0 = accum[0]
        header = ["batch", "micro-batches", "s/step (median)", "time vs 1", meter.peak_label, "peak vs 1",
                  "mean loss (same update)"]
        rows = [[r["batch"], r["micro"], f"{r['s_per_step']:.3f}", _ratio(r["s_per_step"], b0["s_per_step"]),
                 _mib(r["peak"]), _ratio(r["peak"] or 0.0, b0["peak"] or 0.0), f"{r['loss']:.4f}"] for r in accum]
        lines += ["", f"Gradient accumulation ({precisions[0]}, `train_local(micro_batches=k)`): batch {batch}", "",
                  _table(header, rows)]
    return lines, results


# ----------------------------------------------------------------------------- generation


def bench_generation(args: argparse.Namespace, model: Any, tokenizer: Any, task: Any, raw: Any,
                     meter: Meter, precisions: Sequence[str]) -> list[str]:
    from fedlora.models.runtime import resolve_runtime
    from fedlora.tasks.causal_lm import _end_of_turn_id, generate

    encoded = _rows(task, raw["test"], tokenizer, args.gen_prompts, args.max_length, args.seed)
    prompts: list[list[int]] = encoded["prompt_ids"]
    stop = {i for i in (tokenizer.eos_token_id, _end_of_turn_id(tokenizer)) if i is not None}
    outputs: list[tuple[int, torch.Tensor]] = []  # (prompt length, generated ids) of every generate() call
    original = model.generate

    def recording(*a: Any, **kw: Any) -> Any:
        out = original(*a, **kw)
        length = kw["input_ids"].shape[1]
        outputs.append((length, out[:, length:].detach().cpu()))
        return out

    model.generate = recording  # what fedlora's generate() calls; counted without changing it
    results = []
    try:
        for precision in precisions:
            runtime = resolve_runtime(str(meter.device), precision)
            generate(model, tokenizer, prompts[:1], min(4, args.max_new_tokens), runtime, 1)  # warm-up
            for batch in args.gen_batch_sizes:
                outputs.clear()
                meter.reset_peak()
                start = meter.now()
                generate(model, tokenizer, prompts, args.max_new_tokens, runtime, batch)
                seconds = meter.now() - start
                peak = meter.peak_bytes()
                useful = padded = 0
                for _length, new in outputs:
                    padded += new.numel()
                    for row in new.tolist():
                        ends = [i for i, t in enumerate(row) if t in stop]
                        useful += ends[0] + 1 if ends else len(row)
                results.append({"precision": precision, "batch": batch, "calls": len(outputs), "seconds": seconds,
                                "useful": useful, "padded": padded, "peak": peak})
                print(f"  generate {precision} batch {batch}: {useful / seconds:.1f} tok/s (load {_load()})",
                      file=sys.stderr)
    finally:
        del model.generate  # back to the class's method
    base = next((r for r in results if r["batch"] == min(args.gen_batch_sizes) and r["precision"] == "fp32"), results[0])
    header = ["precision", "batch", "generate calls", "seconds", "generated tokens", "generated tok/s",
              "padded tokens", "padded tok/s", "generated tok/s vs base", meter.peak_label]
    rows = [[r["precision"], r["batch"], r["calls"], f"{r['seconds']:.1f}", r["useful"],
             f"{r['useful'] / r['seconds']:.1f}", r["padded"], f"{r['padded'] / r['seconds']:.1f}",
             _ratio(r["useful"] / r["seconds"], base["useful"] / base["seconds"]), _mib(r["peak"])] for r in results]
    lengths = sorted(len(p) for p in prompts)
    return [f"{len(prompts)} test prompts ({lengths[0]}-{lengths[-1]} tokens, median {statistics.median(lengths):.0f}), "
            f"max_new_tokens {args.max_new_tokens}, greedy. Baseline: batch {base['batch']}, {base['precision']}.", "",
            _table(header, rows)]


# ----------------------------------------------------------------------------- memory: fresh subprocesses


def _child(args: argparse.Namespace) -> int:
    """Run in a fresh process: load the model only (``--sim-child 0``) or the engine with N clients."""
    _quiet()
    after_imports = _status_kb("VmHWM")
    started = time.perf_counter()
    result: dict[str, Any] = {"clients": args.sim_child}
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.sim_child == 0:
        from fedlora.models.runtime import resolve_runtime

        model, _ = _model(args.seed, resolve_runtime(args.device, "fp32"))
        result["param_bytes"], result["params"], result["trainable"] = _param_bytes(model)
    else:
        from fedlora.config.run import RunConfig
        from fedlora.engines.local import run

        with tempfile.TemporaryDirectory(prefix="llm-throughput-sim-") as out:
            config = RunConfig(task="gsm8k", data_dir=args.data_dir, clients=args.sim_child, alpha=None, rounds=1,
                               local_steps=1, batch_size=1, max_length=128, max_eval_examples=2, max_new_tokens=4,
                               eval_local_every=0, method=args.sim_method, device=args.device,
                               precision=args.sim_precision, seed=args.seed, out=out)
            history = run(config, progress=False)
            result["train_loss"] = history[-1].get("train_loss") if history else None
    result["seconds"] = time.perf_counter() - started
    result["vmhwm_kb_after_imports"] = after_imports
    result["vmhwm_kb"] = _status_kb("VmHWM")
    result["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kB
    result["cuda_peak"] = float(torch.cuda.max_memory_allocated()) if cuda else None
    print(CHILD_TAG + json.dumps(result), flush=True)
    return 0


def _spawn(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sim-child", str(clients), "--device", args.device,
           "--sim-method", args.sim_method, "--sim-precision", args.sim_precision, "--seed", str(args.seed),
           "--data-dir", args.data_dir] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.sim_timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            result: dict[str, Any] = json.loads(line[len(CHILD_TAG):])
            # RUSAGE_CHILDREN is the max over every child waited for so far: a cross-check, not per child
            result["children_maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            return result
    raise RuntimeError(f"child {shlex.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def bench_memory(args: argparse.Namespace) -> list[str]:
    results = []
    for clients in (0, 1, args.sim_clients):
        r = _spawn(args, clients)
        results.append(r)
        print(f"  memory child {clients} clients: VmHWM {r['vmhwm_kb'] / 1024:.0f} MiB, {r['seconds']:.0f} s "
              f"(load {_load()})", file=sys.stderr)
    floor, one, many = results
    cuda = one.get("cuda_peak") is not None
    header = ["run", "wall s", "VmHWM after imports MiB", "peak RSS (VmHWM) MiB", "ru_maxrss MiB (*)", "vs 1 client"]
    header += ["peak CUDA alloc MiB"] if cuda else []
    rows = []
    for name, r in (("import + load model only", floor), ("engine, 1 client", one),
                    (f"engine, {args.sim_clients} clients", many)):
        row = [name, f"{r['seconds']:.0f}", _mib((r["vmhwm_kb_after_imports"] or 0) * 1024.0),
               _mib(r["vmhwm_kb"] * 1024.0), _mib(r["maxrss_kb"] * 1024.0), _ratio(r["vmhwm_kb"], one["vmhwm_kb"])]
        rows.append(row + ([_mib(r["cuda_peak"])] if cuda else []))
    ratio = many["vmhwm_kb"] / one["vmhwm_kb"]
    verdict = "within" if ratio <= SIM_GOAL else "OVER"
    extra = (many["vmhwm_kb"] - one["vmhwm_kb"]) / 1024
    lines = [f"Engine: gsm8k, method {args.sim_method}, {args.sim_precision}, alpha iid, 1 round, 1 local step, batch 1, "
             "max_length 128, max_eval_examples 2, max_new_tokens 4, eval_local_every 0; each run in a fresh process.",
             f"Model: {floor['params'] / 1e6:.1f} M parameters ({floor['trainable']:,} trainable LoRA), "
             f"{_mib(floor['param_bytes'])} MiB of parameters and buffers.", "",
             _table(header, rows), "",
             "(*) the child's getrusage(RUSAGE_SELF).ru_maxrss: Linux carries the peak of the process image it was "
             "forked from into it, so it is at least this script's RSS at the fork; VmHWM (the new image's peak) is the "
             "figure compared.", "",
             f"**Peak RSS, {args.sim_clients} clients / 1 client: {ratio:.3f}x** ({extra:+.0f} MiB) - {verdict} the "
             f"{SIM_GOAL}x goal."]
    if cuda:
        lines.append(f"Peak CUDA allocation, {args.sim_clients} / 1 client: "
                     f"{_ratio(many['cuda_peak'], one['cuda_peak'])}.")
    return lines


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="precisions for training and generation (default: fp32 on the CPU, fp32 bf16 on CUDA)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="data root holding gsm8k/")
    p.add_argument("--max-length", type=int, default=256, help="tokens per encoded row (training and prompts)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4], help="training batch sizes")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before each configuration")
    p.add_argument("--grad-accum", action="store_true", help="also: the largest batch as 1, 2, 4 micro-batches")
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="generation batch sizes")
    p.add_argument("--gen-prompts", type=int, default=16, help="test prompts generated for at every batch size")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--sim-clients", type=int, default=10, help="clients of the large simulation (against 1)")
    p.add_argument("--sim-method", default="fedit", help="aggregation method of the simulations")
    p.add_argument("--sim-precision", default="fp32", help="precision of the simulations")
    p.add_argument("--sim-timeout", type=int, default=600, help="seconds each simulation child may take")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    p.add_argument("--sim-child", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sim_child is not None:
        return _child(args)
    _quiet()
    from fedlora.models.runtime import resolve_runtime
    from fedlora.tasks import get_task

    runtime = resolve_runtime(args.device, "fp32")
    args.device = str(runtime.device)
    cuda = runtime.device.type == "cuda"
    precisions = args.precision or (["fp32", "bf16"] if cuda and torch.cuda.is_bf16_supported() else ["fp32"])
    meter = Meter(runtime.device)
    command = "python benchmarks/llm_throughput.py" + (" " + shlex.join(argv) if argv else "")
    device_text = torch.cuda.get_device_name(runtime.device) if cuda else f"CPU ({_cpu_model()})"
    md = ["# LLM throughput (SmolLM2-135M-Instruct + LoRA r8 q_proj/v_proj)", "",
          f"- command: `{command}`",
          f"- commit: {_commit()}",
          f"- device: {device_text}; CPU: {_cpu_model()}, {os.cpu_count()} logical cores, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, Python {platform.python_version()}",
          f"- load average (1/5/15 min) at start: {_load()}"]
    if cuda:
        md.append("- CUDA path: timings synchronize before every clock read; memory is torch.cuda.max_memory_allocated")
    if torch.get_num_threads() > 1 and os.getloadavg()[0] >= (os.cpu_count() or 1):
        md.append(f"- WARNING: the load average is at or above the core count and torch uses {torch.get_num_threads()} "
                  "threads; contended torch threads spin and can run many times slower: consider --threads 1")
    t0 = time.perf_counter()
    # memory first: the children are forked while this process is still small (ru_maxrss inherits it at fork)
    if not args.skip_memory:
        print(f"memory (load {_load()})", file=sys.stderr)
        md += ["", f"## Peak memory: {args.sim_clients} clients vs 1 client (fresh subprocesses)", "",
               f"Load average before: {_load()}.", ""]
        md += bench_memory(args)
        md += ["", f"Load average after: {_load()}."]
    if not (args.skip_train and args.skip_generation):
        task = get_task("gsm8k")
        raw = task.load(args.data_dir)
        torch.manual_seed(args.seed)
        model, tokenizer = _model(args.seed, runtime)
        size, n_params, n_train = _param_bytes(model)
        md.append(f"- model: {n_params / 1e6:.1f} M parameters ({n_train:,} trainable), {_mib(size)} MiB")
        if not args.skip_train:
            print(f"training (load {_load()})", file=sys.stderr)
            md += ["", f"## Training ({args.steps} timed steps after {args.warmup} warm-up, max_length "
                       f"{args.max_length}, `fedlora.models.training.train_local`)", "", f"Load average before: {_load()}.", ""]
            lines, _ = bench_training(args, model, tokenizer, task, raw, meter, precisions)
            md += lines + ["", f"Load average after: {_load()}."]
        if not args.skip_generation:
            print(f"generation (load {_load()})", file=sys.stderr)
            md += ["", "## Generation (`fedlora.tasks.causal_lm.generate`)", "", f"Load average before: {_load()}.", ""]
            md += bench_generation(args, model, tokenizer, task, raw, meter, precisions)
            md += ["", f"Load average after: {_load()}."]
        del model
    md += ["", f"Total wall time {time.perf_counter() - t0:.0f} s; load average at the end: {_load()}."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
