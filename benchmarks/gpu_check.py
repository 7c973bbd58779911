"""The GPU path in one script (issue 23 §3): what a GPU machine must show, in ≤ 8 minutes, with torch,
transformers and peft only (no datasets, no flwr, no internet, nothing installed: it puts ./src on sys.path).

    python benchmarks/gpu_check.py --device cuda --out gpu-report.md     # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick                  # here: the same checks at toy sizes

1. ``aggregate()`` on the device equals the CPU result for every registered method (synthetic clients at
   MiniLM's module shapes; 1e-4 relative, the tolerance of tests/unit/aggregation/test_aggregation_device.py).
2. Client batching equals clients trained (and evaluated) one by one, on the device: a random BERT with a head and a random
   GQA Llama, fp32 (stated tolerance 1e-4 absolute on every trained tensor) and bf16 (reported, not gated).
3. Local training at fp32, bf16 and fp16 (loss scaling) on MiniLM shapes: finite losses and seconds per step.
4. Throughput: benchmarks/client_batching.py for MiniLM (32 clients, batch 32 × 64) and the Qwen2.5-0.5B shape
   (8 clients, batch 4 × 256), K = 1 … all, against sequential clients and one adapter.

What it does not run: ``fedlora run`` end to end (it needs ``datasets``, whose wheels with pyarrow exceed what
travels to the machine); the round protocol around training is device-independent and runs on the CPU in CI.
Exit status 1 when a gated check fails; the report (markdown) goes to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]  # fedlora from this checkout, installed or not
from fedlora.util.threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()  # before torch loads (a CPU run of this script on a shared machine)
import torch  # noqa: E402

from fedlora.aggregation import aggregate, available_methods  # noqa: E402
from fedlora.aggregation.outcome import walk_tensors  # noqa: E402
from fedlora.testing.synthetic import least_squares_clients  # noqa: E402

FAILED: list[str] = []


def check(ok: bool, what: str) -> str:
    if not ok:
        FAILED.append(what)
    return "ok" if ok else "**FAIL**"


def _moved(adapter: dict, device: torch.device) -> dict:
    from fedlora.aggregation import LoraPair

    return {m: LoraPair(A=p.A.to(device), B=p.B.to(device)) for m, p in adapter.items()}


def aggregation_section(device: torch.device, quick: bool) -> list[str]:
    from fedlora.aggregation import ClientUpdate

    shapes = {f"layer.{i}.{n}": (24, 24) if quick else (384, 384) for i in range(2 if quick else 12)
              for n in ("query", "value")}
    g, ups = least_squares_clients(shapes, 4 if quick else 8, 4 if quick else 10, seed=4)
    lines = ["## 1. aggregate() on the device vs the CPU", "",
             f"{len(shapes)} modules {next(iter(shapes.values()))}, {len(ups)} clients; tolerance 1e-4 relative.", "",
             "| method | max abs diff | divergence (CPU) | divergence rel diff | CPU s | device s | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for method in available_methods():
        t0 = time.perf_counter()
        ref = aggregate(method, g, ups)
        cpu_s = time.perf_counter() - t0
        moved = [ClientUpdate(adapter=_moved(u.adapter, device), num_examples=u.num_examples, client_id=u.client_id)
                 for u in ups]
        t0 = time.perf_counter()
        got = aggregate(method, _moved(g, device), moved)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dev_s = time.perf_counter() - t0
        expected, actual = dict(walk_tensors(ref)), dict(walk_tensors(got))
        worst, ok = 0.0, expected.keys() == actual.keys()
        for path, want in expected.items():
            have = actual[path].cpu().to(want.dtype)
            worst = max(worst, float((have - want).abs().max())) if want.numel() else worst
            ok = ok and bool(torch.allclose(have, want, rtol=1e-4, atol=1e-6))
        d_ref, d_got = ref.metrics.get("divergence"), got.metrics.get("divergence")
        rel = abs(d_got - d_ref) / max(abs(d_ref), 1e-12) if d_ref is not None and d_got is not None else float("nan")
        ok = ok and (rel != rel or rel < 1e-4)
        lines.append(f"| {method} | {worst:.2e} | {d_ref if d_ref is None else f'{d_ref:.4g}'} | {rel:.1e} | "
                     f"{cpu_s:.3f} | {dev_s:.3f} | {check(ok, f'aggregate {method}')} |")
    return lines


def batching_section(device: torch.device, quick: bool) -> list[str]:
    import client_batching as cb

    from fedlora.aggregation import TrainingPolicy
    from fedlora.models.client_batch import ClientJob, predict_together, train_together
    from fedlora.models.lora_state import get_adapter, get_head, set_adapter, set_head
    from fedlora.models.runtime import Runtime
    from fedlora.models.training import train_local

    lines = ["## 2. Client batching equals clients one by one, on the device", "",
             "Random models, dropout off, 4 clients × 3 steps, different starts; gated at fp32 (1e-4 absolute).", "",
             "| model | precision | max abs diff over trained tensors | |", "|---|---|---:|---|"]
    for name in ("tiny-bert", "tiny-llama"):
        for precision in ("fp32", "bf16"):
            model, loss, vocab = cb.build(name, 4, device)
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            runtime = Runtime(device, precision)
            data = cb.batches(4, 3, 4, 16, vocab, causal=name != "tiny-bert")
            g = torch.Generator().manual_seed(0)
            a0, h0 = get_adapter(model), get_head(model)
            starts = [({m: type(p)(A=p.A + 0.05 * torch.randn(p.A.shape, generator=g),
                                   B=p.B + 0.05 * torch.randn(p.B.shape, generator=g)) for m, p in a0.items()},
                       {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in h0.items()}) for _ in data]
            alone = []
            for (a, h), client in zip(starts, data):
                set_adapter(model, a)
                set_head(model, h)
                train_local(model, iter(client), 3, 1e-2, TrainingPolicy(), 0, runtime=runtime, loss_weight=cb._rows)
                alone.append((get_adapter(model), get_head(model)))
            jobs = [ClientJob(a, h, iter(client)) for (a, h), client in zip(starts, data)]
            together = train_together(model, jobs, 3, 1e-2, TrainingPolicy(), 0, loss=loss, loss_weight=cb._rows,
                                      runtime=runtime)
            worst = 0.0
            for (a, h), out in zip(alone, together):
                for m in a:
                    worst = max(worst, float((a[m].A - out.adapter[m].A).abs().max()),
                                float((a[m].B - out.adapter[m].B).abs().max()))
                for k in h:
                    worst = max(worst, float((h[k] - out.head[k]).abs().max()))
            verdict = check(worst < 1e-4, f"batching {name} fp32") if precision == "fp32" else "reported"
            lines.append(f"| {name} | {precision} | {worst:.2e} | {verdict} |")
            if name == "tiny-bert":  # local evaluation in shared passes: logits vs each client alone
                states = [(o.adapter, o.head) for o in together]
                loaders = [client[:2] for client in data]
                shared = predict_together(model, states, loaders, runtime)
                gap = 0.0
                for (a, h), client, (logits, _) in zip(states, loaders, shared):
                    set_adapter(model, a)
                    set_head(model, h)
                    with torch.inference_mode(), runtime.autocast():
                        own = torch.cat([model(**runtime.to_device({k: v for k, v in b.items() if k != "labels"}))
                                         .logits.float().cpu() for b in client])
                    gap = max(gap, float((own - logits).abs().max()))
                verdict = check(gap < 1e-4, "evaluation together fp32") if precision == "fp32" else "reported"
                lines.append(f"| {name} evaluation (logits) | {precision} | {gap:.2e} | {verdict} |")
    return lines


def precision_section(device: torch.device, quick: bool) -> list[str]:
    import client_batching as cb

    from fedlora.aggregation import TrainingPolicy
    from fedlora.models.runtime import Runtime
    from fedlora.models.training import train_local

    lines = ["## 3. Local training at each precision (MiniLM shapes, batch 32 × 64, 5 steps)", "",
             "| precision | s/step | mean loss | |", "|---|---:|---:|---|"]
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    model, _, vocab = cb.build("tiny-bert" if quick else "minilm", 8, device)
    data = cb.batches(1, 6, 8 if quick else 32, 16 if quick else 64, vocab, causal=False)[0]
    for precision in precisions:
        runtime = Runtime(device, precision)
        train_local(model, iter(data[:1]), 1, 1e-4, TrainingPolicy(), 0, runtime=runtime)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = train_local(model, iter(data[1:]), 5, 1e-4, TrainingPolicy(), 0, runtime=runtime)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / 5
        ok = bool(torch.isfinite(torch.tensor(stats["loss"])))
        lines.append(f"| {precision} | {per_step:.4f} | {stats['loss']:.4f} | {check(ok, f'train {precision}')} |")
    return lines


def throughput_section(device: torch.device, quick: bool, precision: str) -> list[str]:
    import client_batching as cb

    runs = ([["--model", "minilm", "--clients", "4", "--batch", "4", "--seq", "16", "--steps", "2"]] if quick else
            [["--model", "minilm", "--clients", "32", "--batch", "32", "--seq", "64", "--steps", "3"],
             ["--model", "qwen2.5-0.5b", "--clients", "8", "--batch", "4", "--seq", "256", "--steps", "2"]])
    lines = ["## 4. Throughput: client batching", ""]
    for argv in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cb.main([*argv, "--device", str(device), "--precision", precision])
        lines += [f"`python benchmarks/client_batching.py {' '.join(argv)} --device {device} --precision {precision}`",
                  "", out.getvalue().strip(), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a CPU smoke test of the script)")
    parser.add_argument("--precision", default="bf16", help="precision of the throughput tables")
    parser.add_argument("--out", default="", help="also write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    started = time.perf_counter()
    lines = [f"# GPU check: {name}", "",
             f"torch {torch.__version__}, device {device}, {'quick' if args.quick else 'full'} sizes, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for section in (aggregation_section, batching_section, precision_section):
        lines += section(device, args.quick) + [""]
    lines += throughput_section(device, args.quick, args.precision if device.type == "cuda" else "fp32")
    lines += [f"Total {time.perf_counter() - started:.0f} s. Failed: {', '.join(FAILED) or 'none'}."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
