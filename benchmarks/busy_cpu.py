"""What a busy CPU costs torch, and what stops the collapse: threads x OpenMP wait policy x a competing process.

    python benchmarks/busy_cpu.py                 # 8 cells, each in a fresh subprocess (~4 min on 2 busy cores)
    python benchmarks/busy_cpu.py --cells 1,unset,idle 2,unset,busy   # chosen cells only

Each cell is a fresh ``python`` subprocess (OMP_WAIT_POLICY is read when torch loads libgomp, so it can
only be set before ``import torch``) that times three fixed workloads, each for a few steps after one
untimed warm-up, and reports the median seconds per step:

  minilm train   the bundled all-MiniLM-L6-v2 (fedlora's loader), batch 8 x 48 tokens, forward + backward
  llama train    a config-built, random-initialised Llama at SmolLM2-135M's shapes (h=576, 9 heads / 3 kv,
                 MLP 1536, vocab 49152) with 6 of its 30 layers, batch 2 x 128 tokens, forward + backward
  llama decode   the same model, greedy decode of 16 tokens after a 32-token prompt, batch 1 (KV cache):
                 the many small matmuls of evaluation's generation, where spin-waiting threads hurt most

Cells: torch threads {1, 2} x OMP_WAIT_POLICY {unset, PASSIVE} x {idle, busy}. "busy" starts one
competing process spinning a pure-Python loop (one core's worth of load) for the cell's duration.
"idle" means no competitor of ours: on a shared machine other jobs may still run, so the load
average before and after every cell is printed with it. Ratios are against threads=1 / unset / idle,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

WORKLOADS = ("minilm train", "llama train", "llama decode")
CELLS = [(t, w, b) for b in ("idle", "busy") for w in ("unset", "PASSIVE") for t in (1, 2)]


def _child(threads: int, steps: int, budget_s: float) -> None:
    """Runs inside the cell's subprocess: times the workloads, prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.models.classifier import default_model_path

    def timed(step) -> float:
        step()  # warm-up: allocator, first-call kernel selection
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < steps and (not times or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    torch.manual_seed(0)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    minilm = AutoModel.from_pretrained(path)
    batch = tok(["a fixed sentence of moderate length for timing"] * 8, padding="max_length", max_length=48,
                truncation=True, return_tensors="pt")

    def minilm_step() -> None:
        minilm.zero_grad(set_to_none=True)
        minilm(**batch).last_hidden_state.pow(2).mean().backward()

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=6, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True)
    llama = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 128))

    def llama_step() -> None:
        llama.zero_grad(set_to_none=True)
        llama(input_ids=ids, labels=ids).loss.backward()

    prompt = torch.randint(0, config.vocab_size, (1, 32))

    def decode_step() -> None:
        with torch.no_grad():
            llama.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    result = {name: timed(fn) for name, fn in zip(WORKLOADS, (minilm_step, llama_step, decode_step), strict=True)}
    print(json.dumps(result))


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _cell(threads: int, wait: str, load: str, steps: int, budget_s: float) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    if wait != "unset":
        env["OMP_WAIT_POLICY"] = wait
    spinner = _spinner() if load == "busy" else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--steps", str(steps),
                              "--budget", str(budget_s)], env=env, capture_output=True, text=True, check=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help="timed steps per workload (default: %(default)s)")
    p.add_argument("--budget", type=float, default=6.0,
                   help="stop timing a workload after this many seconds (at least one step; default: %(default)s)")
    p.add_argument("--cells", nargs="*", default=None, help="THREADS,WAIT,LOAD e.g. 2,PASSIVE,busy (default: all 8)")
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.steps, args.budget)
        return 0
    cells = CELLS if not args.cells else [(int(t), w, b) for t, w, b in (c.split(",") for c in args.cells)]
    import torch

    cpus = len(os.sched_getaffinity(0))
    print(f"# busy_cpu: {platform.processor() or platform.machine()}, {cpus} usable CPUs, torch {torch.__version__} "
          f"({torch.__config__.parallel_info().splitlines()[-1].strip() or 'parallel backend ?'}), Python "
          f"{platform.python_version()}")
    print(f"# command: python benchmarks/busy_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    started = time.perf_counter()
    rows = []
    for threads, wait, load in cells:
        before = os.getloadavg()[0]
        seconds = _cell(threads, wait, load, args.steps, args.budget)
        rows.append((threads, wait, load, before, os.getloadavg()[0], seconds))
        print(f"# done {threads},{wait},{load}: {seconds}", flush=True)
    base = next((r[5] for r in rows if r[:3] == (1, "unset", "idle")), rows[0][5])
    head = "| threads | OMP_WAIT_POLICY | competitor | load before/after | " + " | ".join(
        f"{w} s/step (ratio)" for w in WORKLOADS) + " |"
    print()
    print(head)
    print("|" + "---|" * (4 + len(WORKLOADS)))
    for threads, wait, load, before, after, seconds in rows:
        cells_text = " | ".join(f"{seconds[w]:.3f} ({seconds[w] / base[w]:.2f}x)" for w in WORKLOADS)
        print(f"| {threads} | {wait} | {'1 spinning process' if load == 'busy' else 'none'} | "
              f"{before:.1f}/{after:.1f} | {cells_text} |")
    print(f"\nratios: seconds per step / threads=1, unset, idle of this run; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
